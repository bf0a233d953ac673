"""Architecture class name -> Hub pipeline tag (written once; the card and scoring both use it)."""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["pipeline_tag_for", "PIPELINE_TAGS"]

PIPELINE_TAGS = (
    ("ForImageClassification", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForAudioClassification", "audio-classification"),
    ("ForSpeechSeq2Seq", "automatic-speech-recognition"),
    ("ForObjectDetection", "object-detection"),
    ("ForSemanticSegmentation", "image-segmentation"),
)


def pipeline_tag_for(architectures: Optional[Sequence[str]]) -> Optional[str]:
    """The Hub pipeline tag of the first architecture with a known head (None if none)."""
    for arch in architectures or []:
        for suffix, tag in PIPELINE_TAGS:
            if arch.endswith(suffix):
                return tag
    return None
