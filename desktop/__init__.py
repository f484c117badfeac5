"""The edge half of specd: drafters, device probing, the client session and the CLI.

Importable without Qt; only ``desktop/ui`` uses PySide6.
"""
