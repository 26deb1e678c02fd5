"""The harness's foundations, used by every other part: errors, data types, atomic file
writes and locks, the generic registry, hyperparameter parsing, model loading, and the
process group of a multi-process launch. Nothing here imports from the rest of
`muse_bench`."""
