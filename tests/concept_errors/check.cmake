# One negative-compile case of concept_errors.cpp: compiles it with -DSMOE_CASE=${CASE} (syntax
# only) and requires that it fails with a first error line matching ${EXPECT}; case 0 must compile.
# INCLUDES: include directories separated by '|'.
string(REPLACE "|" ";" includes "${INCLUDES}")
set(args -std=c++20 -fsyntax-only -DSMOE_CASE=${CASE})
foreach(dir IN LISTS includes)
  list(APPEND args -I${dir})
endforeach()
execute_process(COMMAND ${COMPILER} ${args} ${SOURCE} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(CASE EQUAL 0)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "the control case (SMOE_CASE=0) must compile:\n${out}")
  endif()
  return()
endif()
if(rc EQUAL 0)
  message(FATAL_ERROR "SMOE_CASE=${CASE} compiled, but must fail with: ${EXPECT}")
endif()
string(REGEX MATCH "[^\n]*error:[^\n]*" first_error "${out}")
if(NOT first_error MATCHES "${EXPECT}")
  message(FATAL_ERROR "SMOE_CASE=${CASE}: the first error line\n  ${first_error}\ndoes not match\n  ${EXPECT}\n"
                      "full output:\n${out}")
endif()
message(STATUS "SMOE_CASE=${CASE}: ${first_error}")
