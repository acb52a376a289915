#include "arrowquant/text.h"

#include <gtest/gtest.h>

#include <string>

using arrowquant::text::FirstInvalidUtf8;

TEST(Text, ValidUtf8) {
  EXPECT_EQ(FirstInvalidUtf8(""), 0u);
  EXPECT_EQ(FirstInvalidUtf8("abc"), 3u);
  EXPECT_EQ(FirstInvalidUtf8("\xc3\xa9t\xc3\xa9"), 5u);  // été
  EXPECT_EQ(FirstInvalidUtf8("\xf0\x9f\x98\x80"), 4u);   // U+1F600
}

TEST(Text, InvalidUtf8) {
  EXPECT_EQ(FirstInvalidUtf8("ab\xff"), 2u);
  EXPECT_EQ(FirstInvalidUtf8("\xc0\xaf"), 0u);          // overlong
  EXPECT_EQ(FirstInvalidUtf8("a\xed\xa0\x80"), 1u);     // surrogate
  EXPECT_EQ(FirstInvalidUtf8("\xf4\x90\x80\x80"), 0u);  // above U+10FFFF
  EXPECT_EQ(FirstInvalidUtf8("x\xe2\x82"), 1u);         // cut short
}
