"""The end every recipe shares: a complete checkpoint folder, its model card, an optional evaluation of the saved
folder, a learning-curve plot and a JSON summary.

The folder is complete on its own (weights, config, processor, code files for `trust_remote_code`, `README.md`): a LoRA
run also keeps its adapter under `adapter/` and saves the merged model at the top.
"""

import json
import logging
import os

from .plotting import plot_learning_curve

logger = logging.getLogger("ghostvis")


def finish(trainer, processor, output_dir: str, *, origin: str, summary: dict, summary_file: str,
           plot: bool = True, title: str = "GhostVis training", plot_file: str = "learning_curve.png",
           plot_keys=("loss",), held_out=None, eval_batch_size: int = 32) -> dict | None:
    """Saves the trained model as a complete checkpoint folder and writes what the run measured.

    Every process takes part in `trainer.save_model` (ZeRO-3 gathers the shards); the rest runs on the main process.

    Args:
        trainer (`transformers.Trainer`): the trainer after `train()`.
        processor (`GhostVisProcessor`): saved next to the weights.
        output_dir (`str`): the checkpoint folder.
        origin (`str`): how the model was made, for the model card.
        summary (`dict`): what the recipe measured; `steps` (and `eval`, with `held_out`) are added.
        summary_file (`str`): JSON file name of the summary in `output_dir`.
        plot (`bool`, *optional*, defaults to `True`): plot the logged `plot_keys` against the step as `plot_file`.
        title (`str`, *optional*): the plot's title.
        plot_file (`str`, *optional*, defaults to `"learning_curve.png"`): the plot's file name in `output_dir`.
        plot_keys (`tuple[str]`, *optional*, defaults to `("loss",)`): logged values to plot.
        held_out (`datasets.Dataset`, *optional*): shapes rows to score the *saved* folder on (reloaded as users
            will); the plot is annotated with the colour+shape accuracy.
        eval_batch_size (`int`, *optional*, defaults to 32): generation batch size of that evaluation.

    Returns:
        `dict`: the summary on the main process, `None` on the others.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if _is_peft(model):
        trainer.save_model(os.path.join(output_dir, "adapter"))
        trainer.model = model = model.merge_and_unload()
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return None
    from ..hub import model_card

    processor.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(model_card(model, repo=output_dir, origin=origin))
    summary = {**summary, "steps": trainer.state.global_step}
    if held_out is not None:
        summary["eval"] = evaluate_checkpoint(output_dir, held_out, eval_batch_size, trainer.args.device)
    if plot:
        acc = summary.get("eval", {}).get("color_shape_accuracy")
        plot_learning_curve(trainer.state.log_history, os.path.join(output_dir, plot_file), title=title,
                            keys=plot_keys,
                            annotate=f"held-out colour+shape accuracy {acc:.1%}" if acc is not None else None)
    with open(os.path.join(output_dir, summary_file), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("checkpoint saved to %s", output_dir)
    return summary


def evaluate_checkpoint(path: str, held_out, batch_size: int, device="cpu") -> dict:
    """Reloads a saved checkpoint (as users will), scores it on held-out shapes rows and prints the report."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..evaluation.run import evaluate, format_report

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).to(device)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    result = evaluate(model, processor, "shapes", held_out, batch_size=batch_size,
                      out_dir=os.path.join(path, "eval_shapes"))
    print(format_report("shapes", result), flush=True)
    return result


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
