"""Owns which DICOM files are images to train on: preamble-less data sets, the SOP Class allow-list, burned-in text.

Decided from the header alone (listing time), so a refused object costs no pixel decoding.
"""

from __future__ import annotations

import struct

from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mmkd.data.imaging import RecordError

# An allow-list, not a deny-list: the standard keeps adding objects that carry pixels or bulk data but are not
# acquired images (Label Map / Heightmap Segmentation, new SR templates, Microscopy Bulk Simple Annotations, ...),
# and a deny-list would let each new one in as a training image until someone noticed. Every image storage class
# of PS3.4 is named "... Image Storage" (with its "- For Presentation"/"- For Processing" and "(Retired)"
# variants), so the name in pydicom's UID dictionary decides; the few pixel objects named otherwise are listed.
IMAGE_CLASSES_NAMED_OTHERWISE = {
    "1.2.840.10008.5.1.4.1.1.6.2",    # Enhanced US Volume Storage: a 3-D ultrasound acquisition
    # quantitative maps on the patient's own image grid, read as images in their modality (a dose wash over the
    # planning CT, an ADC or perfusion map, a retinal thickness map); a SEG mask is not such a map: it labels one
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
    "1.2.840.10008.5.1.4.1.1.30",     # Parametric Map Storage
    "1.2.840.10008.5.1.4.1.1.81.1",   # Ophthalmic Thickness Map Storage
    "1.2.840.10008.5.1.4.1.1.82.1",   # Corneal Topography Map Storage
}
# print-ready film sheets (several images and text composed on one page), not one image
_HARDCOPY = "Hardcopy"
# the first group of a data set written without the Part 10 preamble: file meta (0002) or, in old ACR-NEMA style
# exports, the identifying group (0008) that every IOD starts with (SOP Class UID is in it)
_FIRST_GROUPS = (0x0002, 0x0008)
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
        b"UR", b"US", b"UT", b"UV"}


def needs_force(head: bytes, rel: str) -> bool:
    """Whether the file (its first 132 bytes) is read with pydicom's force=True: False for a Part 10 file (DICM at
    128), True for a data set that starts at byte 0 (old exports); anything else is not DICOM (RecordError)."""
    if head[128:132] == b"DICM":
        return False
    if not head:
        raise RecordError(f"not a DICOM file: {rel} (empty file)")
    if len(head) >= 8 and _first_element_plausible(head):
        return True
    raise RecordError(f"not a DICOM file: {rel} (no DICM prefix, and it does not start with a DICOM data element: "
                      f"first bytes {head[:8].hex()})")


def _first_element_plausible(head: bytes) -> bool:
    """The first 8 bytes read as a data element of group 0002/0008, explicit VR (a known VR) or implicit
    (a length that fits an element of those groups), little or big endian."""
    for end in "<>":
        group, _element = struct.unpack(end + "HH", head[:4])
        if group not in _FIRST_GROUPS:
            continue
        if head[4:6] in _VRS:
            return True
        if struct.unpack(end + "I", head[4:8])[0] < 1 << 16:  # implicit VR: group 0002/0008 values are short
            return True
    return False


def implied_transfer_syntax(ds) -> UID | None:
    """The transfer syntax of a data set without file meta, from the encoding pydicom found while reading it
    (only uncompressed data can be stored without file meta: encapsulated pixel data needs the meta's UID)."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian if little else None  # implicit big endian does not exist
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def sop_class(ds) -> UID | None:
    """The object's SOP Class UID, from the data set, else the file meta (a DICOMDIR has only the latter)."""
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return UID(str(uid).strip()) if uid else None


def is_image_class(uid: UID) -> bool | None:
    """True for an image storage class, False for any other storage class pydicom knows, None for a UID it does
    not know (a private SOP class): then whether the file has pixels decides."""
    if uid in IMAGE_CLASSES_NAMED_OTHERWISE:
        return True
    if uid.type != "SOP Class" or "Storage" not in uid.name:
        return None
    return "Image Storage" in uid.name and _HARDCOPY not in uid.name


def refusal(ds, rel: str, burned_in: str, pixels: bool | None) -> str | None:
    """Why this object is not an image to train on (naming the file and the class), or None. `pixels`: whether
    the file has a Pixel Data element (None: not known from the header, as in a deflated data set)."""
    uid = sop_class(ds)
    kind = is_image_class(uid) if uid else None
    if kind is False:
        return f"no image to train on in DICOM file {rel}: its SOP Class is {uid.name} ({uid}), not an image"
    if pixels is False:  # no SOP Class UID, one pydicom does not know, or an image class without its pixels
        what = f"SOP Class {uid.name}" if uid else "no SOP Class UID"
        return f"no image in DICOM file {rel}: no Pixel Data ({what}, Modality {ds.get('Modality') or '?'})"
    if burned_in == "refuse" and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return (f"burned-in annotation in DICOM file {rel}: BurnedInAnnotation is YES (text in the pixels can "
                "identify the patient; curate.dicom_burned_in: keep accepts it)")
    return None
