"""PEFT's PeftType and TaskType: string enums a config's `peft_type` / `task_type` hold, as in PEFT.

Each member equals (and hashes as) its string, and prints as it, so code and files may use either.
"""

from __future__ import annotations

import enum


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:  # "LORA", not "PeftType.LORA" (Python's (str, Enum) default)
        return self.value

    __format__ = str.__format__


class PeftType(_StrEnum):
    """The adapter forms lorakit implements, under PEFT's names."""

    LORA = "LORA"
    VERA = "VERA"
    ADALORA = "ADALORA"


class TaskType(_StrEnum):
    """PEFT's task types (the task class get_peft_model builds)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def as_enum(enum_type: type[_StrEnum], value):
    """`value` as a member of `enum_type` when it names one (PEFT keeps its enums on configs), else unchanged."""
    if isinstance(value, str) and value in enum_type._value2member_map_:
        return enum_type(str.__str__(value))
    return value
