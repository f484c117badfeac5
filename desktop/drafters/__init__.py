"""Draft-model backends behind one ``Drafter`` interface (one file per backend)."""
