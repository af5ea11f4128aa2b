"""Studies behind `rag experiment NAME`: each writes a table (markdown + JSON) and plots."""
