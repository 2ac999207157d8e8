"""The run config: what every peer of a run trains and how (schema, validation, publication)."""
