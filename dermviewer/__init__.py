"""dermviewer: the PySide6 desktop viewer that classifies dermatoscope camera frames in real time."""
