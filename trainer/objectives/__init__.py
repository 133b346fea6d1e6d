"""The pretraining objectives, one per file (paper section 3.2)."""
