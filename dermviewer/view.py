"""The live image widget: the frame, the guide of the classified region, the heat map and the melanoma alert."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QImage, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from dermviewer.inference import Guide, Result


def to_qimage(arr: np.ndarray) -> QImage:
    """RGB or RGBA uint8 -> QImage that owns a copy of the pixels."""
    h, w, c = arr.shape
    fmt = QImage.Format.Format_RGB888 if c == 3 else QImage.Format.Format_RGBA8888
    return QImage(np.ascontiguousarray(arr).data, w, h, w * c, fmt).copy()


WRAP = Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap
PAD = 6


def headline_font() -> QFont:
    return QFont("Sans", 15, QFont.Weight.Bold)


def detail_font() -> QFont:
    return QFont("Sans", 10)


def text_height(font: QFont, width: float, text: str) -> float:
    """The height `text` takes wrapped to `width` in `font`: boxes grow with their text instead of clipping it
    (a narrow window wraps the alert's explanation onto a second line)."""
    return QFontMetricsF(font).boundingRect(QRectF(0, 0, width, 1e5), int(WRAP.value), text).height()


def alert_layout(width: float, text: str) -> tuple[QRectF, list[tuple[QRectF, QFont, str]]]:
    """The alert band and its lines (box, font, text: the headline, then the explanation if any) at a widget width,
    each box tall enough for its wrapped text."""
    headline, _, why = text.partition("\n")
    inner, top, parts = width - 2 * PAD, float(PAD), []
    for font, line in ((headline_font(), headline), (detail_font(), why)):
        if line:
            box = QRectF(PAD, top, inner, text_height(font, inner, line))
            parts.append((box, font, line))
            top = box.bottom() + 2
    return QRectF(0, 0, width, top - 2 + PAD), parts


class FrameView(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumSize(480, 360)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.image: QImage | None = None
        self.frame_shape: tuple[int, int] = (0, 0)
        self.result: Result | None = None
        self.heat: QImage | None = None
        self.guide = Guide()
        self.alert_text = ""
        self.heat_caption = ""
        self.message = ""
        self.frozen = False

    def set_frame(self, rgb: np.ndarray) -> None:
        self.image = to_qimage(rgb)
        self.frame_shape = rgb.shape[:2]

    def set_result(self, result: Result | None) -> None:
        self.result = result
        self.heat = to_qimage(result.heat_rgba) if result is not None and result.heat_rgba is not None else None

    def _target(self) -> QRectF:
        h, w = self.frame_shape
        if not h:
            return QRectF(self.rect())
        s = min(self.width() / w, self.height() / h)
        return QRectF((self.width() - w * s) / 2, (self.height() - h * s) / 2, w * s, h * s)

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(18, 22, 28))
        if self.image is not None:
            tgt = self._target()
            p.drawImage(tgt, self.image)
            h, w = self.frame_shape
            s = tgt.width() / w
            top, left, side, _ = self.guide.box(h, w)
            region = QRectF(tgt.x() + left * s, tgt.y() + top * s, side * s, side * s)
            if self.heat is not None:
                p.drawImage(region, self.heat)
            p.setPen(QPen(QColor(255, 255, 255, 200), 2, Qt.PenStyle.DashLine))
            if self.guide.shape == "circle":
                p.drawEllipse(region)
            else:
                p.drawRect(region)
            if self.heat_caption:
                height = text_height(detail_font(), self.width() - 2 * PAD, self.heat_caption) + 4
                cap = QRectF(0, min(region.bottom() + 4, self.height() - 38 - height), self.width(), height)
                p.fillRect(cap, QColor(18, 22, 28, 170))
                p.setPen(QColor(235, 235, 235))
                p.setFont(detail_font())
                p.drawText(cap.adjusted(PAD, 0, -PAD, 0), WRAP, self.heat_caption)
        if self.alert_text:
            band, parts = alert_layout(self.width(), self.alert_text)
            p.fillRect(band, QColor(198, 40, 40, 235))
            p.setPen(QColor("white"))
            for box, font, line in parts:
                p.setFont(font)
                p.drawText(box, WRAP, line)
        if self.frozen:
            p.setPen(QColor(255, 214, 0))
            p.setFont(QFont("Sans", 14, QFont.Weight.Bold))
            p.drawText(QRectF(10, self.height() - 34, 200, 28), Qt.AlignmentFlag.AlignLeft, "FROZEN")
        if self.message:
            font = QFont("Sans", 12)
            height = max(80.0, text_height(font, self.width() - 60, self.message) + 20)
            box = QRectF(20, (self.height() - height) / 2, self.width() - 40, height)
            p.fillRect(box, QColor(30, 30, 30, 220))
            p.setPen(QColor(255, 196, 0))
            p.setFont(font)
            p.drawText(box.adjusted(10, 0, -10, 0), WRAP, self.message)
        p.end()
