// Helpers shared by the C++ tests.
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <string>
#include <typeinfo>

namespace lorart::testing_util {

// Runs `fn`, expects it to throw exactly `E` (not a subclass: LoraError is an InvalidArgument),
// and checks that the message contains `needle`.
template <class E, class Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
  } catch (const std::exception& e) {
    EXPECT_EQ(typeid(e), typeid(E)) << "wrong exception type, message: " << e.what();
    EXPECT_PRED_FORMAT2(testing::IsSubstring, needle, e.what());
    return;
  }
  ADD_FAILURE() << "expected an exception containing: " << needle;
}

}  // namespace lorart::testing_util
