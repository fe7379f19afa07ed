"""Ready models for the paper's data sets (installed as :mod:`pyro_efa.models`)."""
