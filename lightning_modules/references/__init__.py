"""Reference policies: the providers behind one call (`providers`) and the one-time log-prob cache builder."""
