"""The MLLM tasks of the paper's Tables 3-5: prompts, answer parsing, metrics, judges, data.

* Tasks (:mod:`._prompts`): the paper's prompts verbatim (Appendix A.4.1) for captioning,
  classification (target option "shark") and VQA (target "None of the above"), and the
  parsers of the answers (first integer / first option letter; unparsable = -1).
* Metrics (:mod:`._metrics`): FCS, ACC, ASR, unparsable counts, the caption "% (mean)",
  and the paper's table layout.
* Judges (:mod:`._judges`): ``judge(predictions, references) -> [0, 1]`` scores: exact
  match, CLIP text-text, BLEU / CIDEr (optional extra ``fsjax[judges]``), GPT-style.
* Data (:mod:`._files`): clean/target image pairs, ImageNet classes, ScienceQA files,
  all from local files.
* The embedded instruction data (:mod:`._instructions`) and its word-level tokenizer
  (:mod:`._tokenizer`), to train the embedded multimodal model.
"""

from fsjax.tasks._files import ClassificationImages
from fsjax.tasks._files import ImagePairs
from fsjax.tasks._files import PAPER_IMAGENET_IDS
from fsjax.tasks._files import PAPER_TARGET_IMAGENET_ID
from fsjax.tasks._files import ScienceQA
from fsjax.tasks._files import classification_images
from fsjax.tasks._files import image_pairs
from fsjax.tasks._files import load_scienceqa
from fsjax.tasks._instructions import Example
from fsjax.tasks._instructions import instruction_examples
from fsjax.tasks._instructions import load_instructions
from fsjax.tasks._instructions import vocabulary_texts
from fsjax.tasks._judges import ClipTextJudge
from fsjax.tasks._judges import Judge
from fsjax.tasks._judges import LLMJudge
from fsjax.tasks._judges import LexicalJudge
from fsjax.tasks._judges import check_scores
from fsjax.tasks._judges import exact_match
from fsjax.tasks._judges import judge_captions
from fsjax.tasks._metrics import DEFAULT_THRESHOLD
from fsjax.tasks._metrics import Summary
from fsjax.tasks._metrics import choice_outcomes
from fsjax.tasks._metrics import feature_cosine_similarity
from fsjax.tasks._metrics import features_cosine
from fsjax.tasks._metrics import markdown_table
from fsjax.tasks._metrics import rate_and_mean
from fsjax.tasks._metrics import summarize_captions
from fsjax.tasks._metrics import summarize_choices
from fsjax.tasks._prompts import CAPTION_PROMPT
from fsjax.tasks._prompts import NONE_OF_THE_ABOVE
from fsjax.tasks._prompts import PAPER_CLASSES
from fsjax.tasks._prompts import PAPER_TARGET_CLASS
from fsjax.tasks._prompts import UNPARSABLE
from fsjax.tasks._prompts import Question
from fsjax.tasks._prompts import classification_prompt
from fsjax.tasks._prompts import classification_question
from fsjax.tasks._prompts import parse_integer
from fsjax.tasks._prompts import parse_letter
from fsjax.tasks._prompts import vqa_prompt
from fsjax.tasks._prompts import vqa_question
from fsjax.tasks._tokenizer import IMAGE
from fsjax.tasks._tokenizer import SPECIAL_TOKENS
from fsjax.tasks._tokenizer import build_tokenizer
from fsjax.tasks._tokenizer import save_tokenizer
from fsjax.tasks._tokenizer import training_arrays
from fsjax.tasks import _instructions as instructions
from fsjax.tasks import _judges as judges

__all__ = [
    "CAPTION_PROMPT", "ClassificationImages", "ClipTextJudge", "DEFAULT_THRESHOLD",
    "Example", "IMAGE", "ImagePairs", "Judge", "LLMJudge", "LexicalJudge",
    "NONE_OF_THE_ABOVE", "PAPER_CLASSES", "PAPER_IMAGENET_IDS", "PAPER_TARGET_CLASS",
    "PAPER_TARGET_IMAGENET_ID", "Question", "SPECIAL_TOKENS", "ScienceQA", "Summary",
    "UNPARSABLE", "build_tokenizer", "check_scores", "choice_outcomes",
    "classification_images", "classification_prompt", "classification_question",
    "exact_match", "feature_cosine_similarity", "features_cosine", "image_pairs",
    "instruction_examples", "instructions", "judge_captions", "judges", "load_instructions",
    "load_scienceqa", "markdown_table", "parse_integer", "parse_letter", "rate_and_mean",
    "save_tokenizer", "summarize_captions", "summarize_choices", "training_arrays",
    "vocabulary_texts", "vqa_prompt", "vqa_question",
]
