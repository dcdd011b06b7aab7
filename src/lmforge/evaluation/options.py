"""The options of the evaluation tasks, declared once: for each its name, the Python types it accepts,
its ``lmforge eval`` flag (with the argparse type) and its help.

Which task takes which option comes from the task functions' signatures
(:func:`lmforge.evaluation.harness.task_options`); the sampling options (``--temperature`` ...) are
:class:`lmforge.config.SamplingConfig`'s. This table is read by the harness (:data:`OPTION_TYPES`,
:func:`check_option_type`), by suites (:mod:`.suite`) and by the command line (:data:`CLI_OPTIONS`).
It sits low: nothing from lmforge but the errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class TaskOption:
    """One option of the evaluation tasks."""

    name: str
    types: tuple[type, ...]  # the Python values it accepts (from Python and suite YAML files)
    help: str
    flag: str | None = None  # its ``lmforge eval`` flag; None: from Python and suites only
    arg_type: type | None = str  # argparse's conversion of the flag's value
    nargs: str | None = None
    metavar: str | None = None
    task_types: dict[str, tuple[type, ...]] = field(default_factory=dict)  # narrower types for one task

    def argparse_kwargs(self) -> dict[str, Any]:
        """``add_argument`` keywords of the flag (it defaults to None: the task's own default)."""
        kwargs: dict[str, Any] = {"dest": self.name, "type": self.arg_type, "default": None, "help": self.help}
        if self.nargs is not None:
            kwargs["nargs"] = self.nargs
        if self.metavar is not None:
            kwargs["metavar"] = self.metavar
        return kwargs


TASK_OPTIONS: tuple[TaskOption, ...] = (  # in the order of 'lmforge eval --help'
    TaskOption("format", (str,), "generation: the records' format, as in fine-tuning: auto (from the fields), "
                                 "chat, alpaca, prompt_completion or text", "--format"),
    TaskOption("prompt_template", (str,), "generation: build each prompt with this str.format template over the "
                                          "record's fields, e.g. '{document}\\nSubject:' (with --reference-field)",
               "--prompt-template"),
    TaskOption("reference_field", (str,), "generation: the record field holding the reference (with "
                                          "--prompt-template)", "--reference-field"),
    TaskOption("text_field", (str, int, list, tuple), "perplexity: the JSON records' text field (default: text); "
                                                      "classification: the text column (default: text or "
                                                      "sentence; a 0-based number for CSV/TSV without a header)",
               "--text-field", task_types={"perplexity": (str,)}),
    TaskOption("label_field", (str, int), "classification: the label column (a name, or a 0-based number; "
                                          "default: label)", "--label-field"),
    TaskOption("template", (str,), "qa, classification: the prompt template (str.format with {context} and "
                                   "{question}, or {text} and {label})", "--template"),
    TaskOption("normalize", (bool,), "classification: score a label by its mean log-probability per token "
                                     "instead of the sum"),
    TaskOption("stride", (int,), "perplexity: tokens the scoring window advances (default: the context length)",
               "--stride", int),
    TaskOption("batch_size", (int,), "generation, qa, diversity: sequences generated together (default: 16)",
               "--batch-size", int),
    TaskOption("num_samples", (int,), "diversity: continuations sampled, at least 2 (default: 32)",
               "--num-samples", int),
    TaskOption("beam_size", (int,), "generation, encoder-decoder checkpoints: beam search with N beams (1: greedy "
                                    "or sampling)", "--beam-size", int),
    TaskOption("mbr", (str,), "generation, encoder-decoder checkpoints: of the beam's hypotheses, the one that "
                              "agrees most with the others by this utility, bleu or chrf (minimum Bayes risk "
                              "decoding)", "--mbr"),
    TaskOption("labels", (list, tuple), "candidate labels for classification (default: the labels in the data)",
               "--labels", None, nargs="+", metavar="LABEL"),
    TaskOption("label_names", (dict,), "classification: map the data's label values to the words that are "
                                       "scored, e.g. {0: negative, 1: positive}"),
)

OPTION_TYPES: dict[str, tuple[type, ...]] = {o.name: o.types for o in TASK_OPTIONS}  # sampling: SamplingConfig's
CLI_OPTIONS: tuple[TaskOption, ...] = tuple(o for o in TASK_OPTIONS if o.flag)

_BY_NAME = {o.name: o for o in TASK_OPTIONS}
_WORDS = {"int": "a whole number", "str": "text", "bool": "true or false", "list": "a list", "tuple": "a list",
          "dict": "a mapping"}


def check_option_type(task: str, name: str, value: Any) -> None:
    """Raise ConfigError when ``value`` is not of a type option ``name`` of ``task`` accepts (None and
    options outside the table, such as the sampling ones, pass)."""
    option = _BY_NAME.get(name)
    if option is None or value is None:
        return
    types = option.task_types.get(task, option.types)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        kinds = " or ".join(dict.fromkeys(_WORDS[k.__name__] for k in types))
        raise ConfigError(f"option {name} of the {task} task must be {kinds}, not {value!r}")
