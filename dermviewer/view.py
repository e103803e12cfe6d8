"""The live image widget: the frame, the guide of the classified region, the heat map and the melanoma alert."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from dermviewer.inference import Guide, Result


def to_qimage(arr: np.ndarray) -> QImage:
    """RGB or RGBA uint8 -> QImage that owns a copy of the pixels."""
    h, w, c = arr.shape
    fmt = QImage.Format.Format_RGB888 if c == 3 else QImage.Format.Format_RGBA8888
    return QImage(np.ascontiguousarray(arr).data, w, h, w * c, fmt).copy()


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
                cap = QRectF(0, min(region.bottom() + 4, self.height() - 60), self.width(), 22)
                p.fillRect(cap, QColor(18, 22, 28, 170))
                p.setPen(QColor(235, 235, 235))
                p.setFont(QFont("Sans", 10))
                p.drawText(cap, Qt.AlignmentFlag.AlignCenter, self.heat_caption)
        if self.alert_text:
            headline, _, why = self.alert_text.partition("\n")
            band = QRectF(0, 0, self.width(), 66 if why else 54)
            p.fillRect(band, QColor(198, 40, 40, 235))
            p.setPen(QColor("white"))
            p.setFont(QFont("Sans", 15, QFont.Weight.Bold))
            p.drawText(QRectF(8, 4, self.width() - 16, 34), Qt.AlignmentFlag.AlignCenter, headline)
            if why:
                p.setFont(QFont("Sans", 10))
                p.drawText(QRectF(8, 38, self.width() - 16, 24),
                           Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, why)
        if self.frozen:
            p.setPen(QColor(255, 214, 0))
            p.setFont(QFont("Sans", 14, QFont.Weight.Bold))
            p.drawText(QRectF(10, self.height() - 34, 200, 28), Qt.AlignmentFlag.AlignLeft, "FROZEN")
        if self.message:
            box = QRectF(20, self.height() / 2 - 40, self.width() - 40, 80)
            p.fillRect(box, QColor(30, 30, 30, 220))
            p.setPen(QColor(255, 196, 0))
            p.setFont(QFont("Sans", 12))
            p.drawText(box, Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self.message)
        p.end()
