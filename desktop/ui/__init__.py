"""The PySide6 tray app; the only place specd imports Qt."""
