# Sourced by the benchmarks: `median` prints the median of the numbers on its input, one a line
# (nothing when there are none); the callers format it.
median() {
  sort -g | awk '{v[NR] = $1} END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
