"""Edit-request data: loading and validation of ZsRE, CounterFact (flat and ROME
formats), MQuAKE and user files, deterministic splits, and teacher-forced
tokenisation into padded numpy arrays."""

from .records import (
    FORMATS,
    DataError,
    EditRequest,
    LoadResult,
    detect_format,
    file_sha256,
    find_duplicates,
    load_requests,
    request_hash,
    resolve_data_path,
    split_requests,
)
from .tokenize import (
    ANSWER_BUCKETS,
    FIELDS,
    IGNORE,
    LENGTH_BUCKETS,
    TeacherForced,
    check_lengths,
    encode,
    encode_texts,
    pad_id_of,
    prompt_ids,
    target_ids,
    subject_last_token,
)

__all__ = [
    "FORMATS",
    "DataError",
    "EditRequest",
    "LoadResult",
    "detect_format",
    "load_requests",
    "split_requests",
    "request_hash",
    "find_duplicates",
    "file_sha256",
    "resolve_data_path",
    "ANSWER_BUCKETS",
    "FIELDS",
    "IGNORE",
    "LENGTH_BUCKETS",
    "TeacherForced",
    "check_lengths",
    "encode",
    "encode_texts",
    "pad_id_of",
    "prompt_ids",
    "target_ids",
    "subject_last_token",
]
