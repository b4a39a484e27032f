"""Per-part YAML configs (package data, so an installed `defect-synth` finds them too)."""
