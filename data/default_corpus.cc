// The built-in default corpus and the byte tokenizer.
//
// The corpus is generated here from a small grammar with a fixed seed, so every build and every
// rank sees the same ~1.5 MB of text. It has structure at several ranges, which makes it useful
// for smoke-testing a byte-level model:
//   - spelling: a closed vocabulary of ~150 words (learned first; loss drops below ~2.5 nats fast);
//   - syntax: a few sentence templates;
//   - in-context recall: a story states where an object is (or what color it is), a question a few
//     sentences later asks and the answer repeats it -- only a model that looks back gets it right;
//   - arithmetic lines ("17 + 25 = 42."): the result is a function of the operands.
#include <cstdint>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/random.h"
#include "data/dataset.h"

namespace lasp {

std::vector<uint32_t> byte_tokenize(const std::string& text) {
  std::vector<uint32_t> tokens(text.size());
  for (size_t i = 0; i < text.size(); ++i) tokens[i] = static_cast<unsigned char>(text[i]);
  return tokens;
}

std::string byte_detokenize(const std::vector<uint32_t>& tokens) {
  std::string text(tokens.size(), '\0');
  for (size_t i = 0; i < tokens.size(); ++i) {
    LASP_CHECK(tokens[i] < 256) << "byte_detokenize: token " << tokens[i] << " at index " << i
                                << " is not a byte (the byte tokenizer's vocabulary is 256)";
    text[i] = static_cast<char>(tokens[i]);
  }
  return text;
}

namespace {

// splitmix64: a small, fully specified generator (std:: distributions differ between libraries).
class CorpusRng {
 public:
  explicit CorpusRng(uint64_t seed) : state_(seed) {}
  uint64_t next() { return splitmix64(state_); }
  // Uniform in [0, n) (multiply-shift; the bias is below 2^-50 for our n).
  int below(int n) { return static_cast<int>((static_cast<unsigned __int128>(next()) * n) >> 64); }
  int range(int lo, int hi) { return lo + below(hi - lo + 1); }  // inclusive
  template <size_t N>
  const char* pick(const char* const (&words)[N]) {
    return words[below(static_cast<int>(N))];
  }

 private:
  uint64_t state_;
};

const char* const kNames[] = {"Alice", "Bob",  "Carol", "Dave", "Emma", "Frank", "Grace", "Henry",
                              "Ivy",   "Jack", "Kate",  "Leo",  "Mia",  "Noah",  "Olivia", "Paul"};
const char* const kColors[] = {"red", "blue", "green", "yellow", "black", "white", "brown", "orange"};
const char* const kSizes[] = {"small", "big", "old", "new", "heavy", "tiny"};
// Objects whose plural is the word plus "s".
const char* const kObjects[] = {"ball", "cup", "book", "key",  "lamp", "hat",  "coin",  "apple",
                                "map",  "pen", "bag",  "bell", "clock", "shoe", "stone", "card"};
const char* const kLocations[] = {"in the kitchen", "in the garden",  "in the library", "at the market",
                                  "at the station", "near the river", "by the window",  "on the table",
                                  "under the bed",  "behind the door", "in the box",    "on the shelf"};
const char* const kPlaces[] = {"kitchen", "garden", "library", "market", "station", "park", "school", "office"};
const char* const kPutVerbs[] = {"put", "left", "hid", "placed", "dropped"};
const char* const kActivities[] = {"was reading a book", "was cooking soup", "was singing a song",
                                   "was cleaning the floor", "was writing a letter", "was sleeping",
                                   "was painting a picture", "was drinking tea"};
const char* const kWeather[] = {"sunny", "cold", "warm", "rainy", "windy", "quiet"};
const char* const kTimes[] = {"In the morning", "Later", "After lunch", "In the evening", "Then", "At noon"};

class CorpusWriter {
 public:
  explicit CorpusWriter(std::string& out) : out_(out) {}
  CorpusWriter& operator<<(const char* s) {
    out_ += s;
    return *this;
  }
  CorpusWriter& operator<<(int v) {
    out_ += std::to_string(v);
    return *this;
  }

 private:
  std::string& out_;
};

// "Alice put the red cup in the kitchen. Bob was cooking soup in the garden. ... Where is the red cup?
//  The red cup is in the kitchen."
void write_story(CorpusRng& rng, CorpusWriter& w) {
  const char* name = rng.pick(kNames);
  const char* adj = rng.below(2) ? rng.pick(kColors) : rng.pick(kSizes);
  const char* obj = rng.pick(kObjects);
  const char* loc = rng.pick(kLocations);
  w << name << " " << rng.pick(kPutVerbs) << " the " << adj << " " << obj << " " << loc << ".";
  const int fillers = rng.range(1, 3);
  for (int i = 0; i < fillers; ++i) {
    switch (rng.below(3)) {
      case 0:
        w << " " << rng.pick(kNames) << " " << rng.pick(kActivities) << " in the " << rng.pick(kPlaces) << ".";
        break;
      case 1:
        w << " " << rng.pick(kTimes) << " " << name << " walked to the " << rng.pick(kPlaces) << ".";
        break;
      default:
        w << " The day was " << rng.pick(kWeather) << ".";
        break;
    }
  }
  if (rng.below(2)) {
    w << " Where is the " << adj << " " << obj << "? The " << adj << " " << obj << " is " << loc << ".\n";
  } else {
    w << " Who hid the " << adj << " " << obj << "? It was " << name << ".\n";
  }
}

// "Dave had 4 keys. Mia gave Dave 3 more. Now Dave has 7 keys."
void write_counting(CorpusRng& rng, CorpusWriter& w) {
  const char* a = rng.pick(kNames);
  const char* b = rng.pick(kNames);
  const char* obj = rng.pick(kObjects);
  const int n = rng.range(2, 9), m = rng.range(1, 9);
  if (rng.below(3) == 0 && m < n) {
    w << a << " had " << n << " " << obj << "s. " << a << " gave " << b << " " << m << " of them. Now "
      << a << " has " << (n - m) << " " << obj << (n - m == 1 ? "." : "s.") << "\n";
  } else {
    w << a << " had " << n << " " << obj << "s. " << b << " gave " << a << " " << m << " more. Now " << a
      << " has " << (n + m) << " " << obj << "s.\n";
  }
}

// "The cup is blue. The hat is green. What color is the cup? The cup is blue."
void write_colors(CorpusRng& rng, CorpusWriter& w) {
  const int k = rng.range(2, 3);
  int objs[3], cols[3];
  for (int i = 0; i < k; ++i) {
    bool fresh;
    do {  // distinct objects so the question has one answer
      objs[i] = rng.below(static_cast<int>(std::size(kObjects)));
      fresh = true;
      for (int j = 0; j < i; ++j) fresh = fresh && objs[j] != objs[i];
    } while (!fresh);
    cols[i] = rng.below(static_cast<int>(std::size(kColors)));
    w << (i ? " " : "") << "The " << kObjects[objs[i]] << " is " << kColors[cols[i]] << ".";
  }
  const int q = rng.below(k);
  w << " What color is the " << kObjects[objs[q]] << "? The " << kObjects[objs[q]] << " is "
    << kColors[cols[q]] << ".\n";
}

// "17 + 25 = 42." lines (also "-" with a non-negative result and "*" up to 12 x 12).
void write_arithmetic(CorpusRng& rng, CorpusWriter& w) {
  const int lines = rng.range(2, 4);
  for (int i = 0; i < lines; ++i) {
    switch (rng.below(3)) {
      case 0: {
        const int a = rng.range(0, 99), b = rng.range(0, 99);
        w << a << " + " << b << " = " << (a + b) << ".\n";
        break;
      }
      case 1: {
        int a = rng.range(0, 99), b = rng.range(0, 99);
        if (a < b) std::swap(a, b);
        w << a << " - " << b << " = " << (a - b) << ".\n";
        break;
      }
      default: {
        const int a = rng.range(1, 12), b = rng.range(1, 12);
        w << a << " * " << b << " = " << (a * b) << ".\n";
        break;
      }
    }
  }
}

}  // namespace

std::string default_corpus_text(size_t min_bytes) {
  std::string text;
  text.reserve(min_bytes + 4096);
  CorpusRng rng(0x1A5B2C0FFEEull);
  CorpusWriter w(text);
  while (text.size() < min_bytes) {
    const int kind = rng.below(10);  // stories 4, counting 2, colors 2, arithmetic 2 in 10
    if (kind < 4) {
      write_story(rng, w);
    } else if (kind < 6) {
      write_counting(rng, w);
    } else if (kind < 8) {
      write_colors(rng, w);
    } else {
      write_arithmetic(rng, w);
    }
  }
  return text;
}

}  // namespace lasp
