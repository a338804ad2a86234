// placeholder: being written
#include "catch.hpp"
