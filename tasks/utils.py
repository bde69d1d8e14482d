"""Document processing for the offline HellaSwag and WinoGrande tasks.

These reproduce what lm-eval 0.4.13 does for its own `hellaswag` and `winogrande` tasks
(tests/test_eval.py checks the rendered prompts against lm-eval's configs), so scores on the
packaged data are comparable with scores on the Hub data.
"""
import re


# ----------------------------------------------------------------------------- HellaSwag

def _clean(text):
    # WikiHow contexts carry "[title]"-style markers and double spaces; lm-eval removes them.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    """Adds query ("<activity>: <context>"), choices (four cleaned endings) and gold (int)."""
    def process(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean(doc["activity_label"] + ": " + context),
            "choices": [_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }
    return dataset.map(process)


# ----------------------------------------------------------------------------- WinoGrande
# Partial scoring: the blank "_" splits the sentence; each option fills it to make one context,
# and both contexts are scored on the same continuation (the text after the blank).

def winogrande_doc_to_text(doc):
    """The index of the correct context (doc_to_choice below) -- lm-eval's convention."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1:].strip()


def winogrande_doc_to_choice(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
