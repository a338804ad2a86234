// The Catch2 main for every test executable (v3 brings its own).
#ifndef SMOE_CATCH3
#define CATCH_CONFIG_MAIN
#include "catch.hpp"
#endif
