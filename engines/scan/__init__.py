"""dermscan: offline batch scanning of a folder of dermoscopy images into a CSV and an HTML report."""
