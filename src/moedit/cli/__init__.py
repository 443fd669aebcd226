"""Thin command-line front end: `moedit train|sample`."""
