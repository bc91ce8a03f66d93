"""C-STORE and C-ECHO response statuses (PS3.4 B.2.3, PS3.7 C), by name."""

from __future__ import annotations

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# The 0xC000-0xCFFF "cannot understand" range, one code per reason so a sender's log says why.
CANNOT_PARSE_DATASET = 0xC001
MISSING_UID = 0xC002
INVALID_UID = 0xC003
SOP_INSTANCE_MISMATCH = 0xC004
SERIES_IN_OTHER_STUDY = 0xC005

# A-ASSOCIATE-RJ (result, source, diagnostic) as pynetdicom's ACSE sends them (PS3.8 9.3.4).
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

REJECT_REASONS = {
    REJECT_CALLING_AE: "calling AE title not recognised",
    REJECT_CALLED_AE: "called AE title not recognised",
    REJECT_LOCAL_LIMIT: "local limit exceeded",
}
