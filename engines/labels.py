"""The seven HAM10000 diagnostic classes, in the one order every model, file and report uses."""

CLASS_CODES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

MEL_INDEX: int = CLASS_CODES.index("mel")


def class_name(code: str) -> str:
    return CLASS_NAMES.get(code, code)
