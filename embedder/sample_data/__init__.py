"""The bundled sample data (generated files only; the generator is tools/build_sample_data.py). No code here."""
