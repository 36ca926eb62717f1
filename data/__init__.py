"""Token streams for training: raw text -> tokens -> packed sequences, and a synthetic source."""
