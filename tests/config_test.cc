// The YAML configuration: defaults, overrides, and the error messages users see.
#include <gtest/gtest.h>

#include <string>

#include "core/check.h"
#include "core/config.h"
#include "core/env.h"
#include "tests/test_util.h"

namespace lasp {
namespace {

// The message of the lasp::Error thrown by fn ("" if none).
template <typename Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, ParsesSectionsIntoTypedFieldsAndKeepsDefaults) {
  const Config c = parse_config("model:\n  hidden: 64\n  pattern: LLLS\noptim:\n  lr: 1.5e-3\nparallel:\n  zigzag: true\n  sp: 2\n",
                                "test.yaml");
  EXPECT_EQ(c.model.hidden, 64);
  EXPECT_EQ(c.model.pattern, "LLLS");
  EXPECT_DOUBLE_EQ(c.optim.lr, 1.5e-3);
  EXPECT_TRUE(c.parallel.zigzag);
  EXPECT_EQ(c.parallel.sp, 2);
  EXPECT_EQ(c.model.layers, Config().model.layers);
}

TEST(Config, UnknownKeyNamesFileLineAndClosestKey) {
  const std::string msg = error_of([] { parse_config("model:\n  hiden: 64\n", "cfg.yaml"); });
  EXPECT_NE(msg.find("cfg.yaml:2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.hiden"), std::string::npos) << msg;
  EXPECT_NE(msg.find("did you mean 'model.hidden'"), std::string::npos) << msg;
  const std::string sec = error_of([] { parse_config("optimizer:\n  lr: 1\n", "cfg.yaml"); });
  EXPECT_NE(sec.find("did you mean 'optim'"), std::string::npos) << sec;
}

TEST(Config, WrongTypeAndOutOfRangeValuesNameTheKeyAndWhatIsAllowed) {
  const std::string type = error_of([] { parse_config("train:\n  steps: many\n", "a.yaml"); });
  EXPECT_NE(type.find("train.steps must be an integer"), std::string::npos) << type;
  const std::string range = error_of([] { parse_config("optim:\n  beta2: 1.5\n", "a.yaml"); });
  EXPECT_NE(range.find("optim.beta2"), std::string::npos) << range;
  EXPECT_NE(range.find("out of range"), std::string::npos) << range;
  const std::string choice = error_of([] { parse_config("model:\n  decay: linear\n", "a.yaml"); });
  EXPECT_NE(choice.find("none | constant | data"), std::string::npos) << choice;
  const std::string neg = error_of([] { parse_config("train:\n  seed: -3\n", "a.yaml"); });
  EXPECT_NE(neg.find("train.seed"), std::string::npos) << neg;
  const std::string syntax = error_of([] { parse_config("model: [1, 2\n", "a.yaml"); });
  EXPECT_NE(syntax.find("YAML syntax error"), std::string::npos) << syntax;
}

TEST(Config, CrossKeyRulesAreChecked) {
  EXPECT_NE(error_of([] { parse_config("model:\n  heads: 6\n  kv_heads: 4\n", "a.yaml"); }).find("multiple of model.kv_heads"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_config("train:\n  seq_len: 100\nparallel:\n  sp: 3\n", "a.yaml"); })
                .find("divisible by parallel.sp"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_config("model:\n  pattern: LLX\n", "a.yaml"); }).find("model.pattern"),
            std::string::npos);
}

TEST(Config, SetOverridesApplyAfterTheFileWithTheSameChecks) {
  const Config c = parse_config("train:\n  steps: 10\n", "a.yaml", {"train.steps=25", "model.decay=data", "run.dir=/tmp/x"});
  EXPECT_EQ(c.train.steps, 25);
  EXPECT_EQ(c.model.decay, "data");
  EXPECT_EQ(c.run.dir, "/tmp/x");
  EXPECT_NE(error_of([] { parse_config("", "a.yaml", {"train.stepz=3"}); }).find("did you mean 'train.steps'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_config("", "a.yaml", {"trainsteps"}); }).find("section.key=value"), std::string::npos);
}

TEST(Config, ResolvedYamlRoundTripsToTheSameConfig) {
  Config c = parse_config("model:\n  hidden: 48\n  pattern: LS\ndata:\n  val: \"\"\n", "a.yaml");
  const std::string yaml = config_to_yaml(c);
  const Config back = parse_config(yaml, "resolved.yaml");
  EXPECT_EQ(config_to_yaml(back), yaml);
  EXPECT_EQ(back.model.hidden, 48);
  EXPECT_NE(config_reference().find("parallel.sp_method"), std::string::npos);
}

TEST(Config, MissingFileIsAClearError) {
  EXPECT_NE(error_of([] { load_config("/nonexistent/x.yaml"); }).find("cannot open config file"), std::string::npos);
}

// Environment switches (core/env.h): unset and empty pick the first choice, each name its index,
// anything else is an error naming the variable, the value and every choice.
TEST(EnvChoice, UnsetEmptyNamedAndUnknownValues) {
  const char* var = "LASP_TEST_ENV_CHOICE";
  {
    testing::ScopedEnv e(var, nullptr);
    EXPECT_EQ(env_choice(var, {"auto", "native", "emulated"}), 0);
  }
  {
    testing::ScopedEnv e(var, "");
    EXPECT_EQ(env_choice(var, {"auto", "native", "emulated"}), 0);
  }
  {
    testing::ScopedEnv e(var, "emulated");
    EXPECT_EQ(env_choice(var, {"auto", "native", "emulated"}), 2);
  }
  {
    testing::ScopedEnv e(var, "fast");
    EXPECT_NE(error_of([&] { env_choice(var, {"auto", "native", "emulated"}); })
                  .find("LASP_TEST_ENV_CHOICE=fast: expected auto, native or emulated"),
              std::string::npos);
    EXPECT_NE(error_of([&] { env_choice(var, {"auto", "mma"}); }).find("expected auto or mma"), std::string::npos);
  }
}

}  // namespace
}  // namespace lasp
