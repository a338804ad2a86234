# The README's quick-start snippet must be the code examples/quickstart.cpp compiles
# (between its example-begin / example-end markers, unindented), so the README cannot rot.
# -DNAME=other and -DREADME=doc check another example's region (default: quickstart).
if(NOT DEFINED NAME)
  set(NAME quickstart)
endif()
file(READ ${EXAMPLE} example)
string(REGEX MATCH "// example-begin ${NAME}\n(.*)  // example-end ${NAME}" _ "${example}")
if(NOT CMAKE_MATCH_1)
  message(FATAL_ERROR "no example-begin/example-end ${NAME} markers in ${EXAMPLE}")
endif()
# CMake's REGEX REPLACE re-anchors ^ after every match, so unindent line starts explicitly.
string(REPLACE "\n  " "\n" snippet "\n${CMAKE_MATCH_1}")
string(SUBSTRING "${snippet}" 1 -1 snippet)
file(READ ${README} readme)
string(FIND "${readme}" "${snippet}" position)
if(position EQUAL -1)
  message(FATAL_ERROR "${README} does not contain the ${NAME} code of ${EXAMPLE}:\n${snippet}")
endif()
message(STATUS "README quick-start matches ${EXAMPLE}")
