"""Training side: INT4 QAT (fake quant + STE), FP8 blockwise training linears, trainer core."""
