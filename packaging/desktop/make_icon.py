"""Draws the application icon (dermedge.png, 256x256): a dermatoscope ring around a lesion-brown dot."""
import sys

from PIL import Image, ImageDraw

size = 256
img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
d = ImageDraw.Draw(img)
d.ellipse((8, 8, size - 8, size - 8), fill=(29, 79, 145, 255))
d.ellipse((40, 40, size - 40, size - 40), fill=(246, 226, 212, 255))
d.ellipse((92, 84, 170, 166), fill=(120, 72, 44, 255))
d.ellipse((112, 104, 142, 134), fill=(70, 40, 26, 255))
img.save(sys.argv[1] if len(sys.argv) > 1 else "dermedge.png")
