"""Bridges to other libraries (LANGUAGE.md section 10); each submodule imports its library lazily."""
