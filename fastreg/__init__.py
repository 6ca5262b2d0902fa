"""fastreg: distill large frozen self-supervised teachers into small fast students (SimReg, SEED)."""
