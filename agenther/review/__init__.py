"""Measuring precision with people: a stratified sample of a run's judged relabels for a person to
label (`sample`), and the labels scored against what the judges decided (`score`)."""
