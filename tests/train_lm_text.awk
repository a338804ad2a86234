# The train_lm tests' text: 2500 sentences of common words, from a fixed awk seed (> 20 kB).
BEGIN {
  srand(7)
  n = split("the of and to a in is was he for it with as his on be at by that had she they", w, " ")
  for (i = 0; i < 2500; ++i) {
    line = ""
    m = 4 + int(rand() * 8)
    for (j = 0; j < m; ++j) line = line (j ? " " : "") w[1 + int(rand() * n)]
    print toupper(substr(line, 1, 1)) substr(line, 2) "."
  }
}
