"""Samplers equal to diffusers' schedulers (pure mlx.core + Python), A1111's sampler and schedule-type names, and
building a sampler from a model's scheduler_config.json.

A sampler is an algorithm (`euler`, `dpmpp_2m`, ...); a schedule chooses its noise levels as A1111 1.9+ separates
them: `default` (the checkpoint's config), `karras`, `exponential`, `beta` (diffusers' use_karras_sigmas,
use_exponential_sigmas, use_beta_sigmas) or `sgm_uniform` (timestep_spacing "trailing"). A name may carry its
schedule (`dpmpp_2m_karras`, "DPM++ 2M SDE Karras").
"""

from dataclasses import dataclass

from .consistency import LCMScheduler, TCDScheduler
from .ddim import DDIMScheduler, PNDMScheduler
from .dpmsolver import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler
from .schedules import SPACINGS
from .second_order import (
    DPMSolverSDEScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
)
from .unipc import DEISMultistepScheduler, UniPCMultistepScheduler

_NO_SIGMA_SCHEDULE = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)


@dataclass(frozen=True)
class Schedule:
    label: str  # A1111's "Schedule type"
    options: dict  # the scheduler config it sets
    description: str


SCHEDULES = {
    "karras": Schedule(
        "Karras",
        {**_NO_SIGMA_SCHEDULE, "use_karras_sigmas": True},
        "Karras et al. 2022 (rho 7): more steps at low noise",
    ),
    "exponential": Schedule(
        "Exponential", {**_NO_SIGMA_SCHEDULE, "use_exponential_sigmas": True}, "evenly spaced in log sigma"
    ),
    "beta": Schedule(
        "Beta", {**_NO_SIGMA_SCHEDULE, "use_beta_sigmas": True}, "Beta(0.6, 0.6) quantiles: more steps at both ends"
    ),
    "sgm_uniform": Schedule(
        "SGM Uniform",
        {**_NO_SIGMA_SCHEDULE, "timestep_spacing": "trailing"},
        "trailing timestep spacing (SDXL-Lightning, Hyper-SD, Turbo)",
    ),
}
_SIGMA = ("karras", "exponential", "beta", "sgm_uniform")


@dataclass(frozen=True)
class Sampler:
    cls: type
    options: dict  # the config options that define the sampler
    display: str  # A1111's name
    schedules: tuple  # the schedules it accepts besides "default"; sgm_uniform also means timestep_spacing works
    description: str


_SDE = dict(algorithm_type="sde-dpmsolver++", solver_type="midpoint")
SAMPLERS = {
    "euler": Sampler(EulerDiscreteScheduler, {}, "Euler", _SIGMA, "Euler (Karras et al. 2022); deterministic"),
    "euler_a": Sampler(
        EulerAncestralDiscreteScheduler, {}, "Euler a", ("sgm_uniform",), "Euler ancestral: fresh noise each step"
    ),
    "heun": Sampler(HeunDiscreteScheduler, {}, "Heun", _SIGMA, "Heun, 2nd order: two model calls per step"),
    "lms": Sampler(LMSDiscreteScheduler, {}, "LMS", _SIGMA, "linear multistep, up to 4th order"),
    "dpm2": Sampler(KDPM2DiscreteScheduler, {}, "DPM2", _SIGMA, "DPM-Solver-2: two model calls per step"),
    "dpm2_a": Sampler(KDPM2AncestralDiscreteScheduler, {}, "DPM2 a", _SIGMA, "DPM2 with ancestral noise"),
    "dpmpp_2s_a": Sampler(
        DPMSolverSinglestepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"),
        "DPM++ 2S a",
        ("karras", "exponential", "beta"),
        "DPM-Solver++(2S) singlestep as diffusers (deterministic: no ancestral noise, unlike A1111's)",
    ),
    "dpmpp_2m": Sampler(
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"),
        "DPM++ 2M",
        _SIGMA,
        "DPM-Solver++ 2M, 2nd-order multistep; sharp at 15-25 steps",
    ),
    "dpmpp_sde": Sampler(DPMSolverSDEScheduler, {}, "DPM++ SDE", _SIGMA, "DPM-Solver++ SDE, two model calls a step"),
    "dpmpp_2m_sde": Sampler(
        DPMSolverMultistepScheduler, dict(**_SDE, solver_order=2), "DPM++ 2M SDE", _SIGMA, "DPM-Solver++ 2M, SDE"
    ),
    "dpmpp_3m_sde": Sampler(
        DPMSolverMultistepScheduler, dict(**_SDE, solver_order=3), "DPM++ 3M SDE", _SIGMA, "DPM-Solver++ 3M, SDE"
    ),
    "ddim": Sampler(DDIMScheduler, {}, "DDIM", ("sgm_uniform",), "DDIM (Song et al. 2020), eta 0; deterministic"),
    "pndm": Sampler(
        PNDMScheduler, dict(skip_prk_steps=True), "PLMS", ("sgm_uniform",), "PLMS (pseudo linear multistep), SD 1.5's"
    ),
    "unipc": Sampler(UniPCMultistepScheduler, {}, "UniPC", _SIGMA, "UniPC predictor-corrector, few steps"),
    "deis": Sampler(
        DEISMultistepScheduler,
        dict(algorithm_type="deis", solver_type="logrho"),
        "DEIS",
        _SIGMA,
        "DEIS log-rho multistep, few steps",
    ),
    "lcm": Sampler(LCMScheduler, {}, "LCM", (), "latent consistency: LCM models and LCM-LoRA, 2-8 steps"),
    "tcd": Sampler(TCDScheduler, {}, "TCD", (), "trajectory consistency (eta 0.3): TCD and Hyper-SD LoRAs"),
}

# A1111's display names (written to PNG metadata, accepted as aliases) of our names and of names with a schedule
DISPLAY_NAMES = {name: s.display for name, s in SAMPLERS.items()} | {
    f"{name}_{schedule}": f"{s.display} {SCHEDULES[schedule].label}"
    for name, s in SAMPLERS.items()
    for schedule in s.schedules
}
_ALIASES = {key.lower(): name for name, s in SAMPLERS.items() for key in (name, s.display)}
_SCHEDULE_ALIASES = {key.lower(): name for name, s in SCHEDULES.items() for key in (name, s.label)}
_NO_SCHEDULE = ("", "default", "automatic")  # A1111's "Automatic": the sampler's default


def _normalized(name):
    return " ".join(str(name).split()).lower()


def parse_schedule(label):
    """Our schedule name for a schedule name or A1111 "Schedule type" label (any case); None for None, "default"
    and A1111's "Automatic"."""
    key = None if label is None else _normalized(label)
    if key is None or key in _NO_SCHEDULE:
        return None
    if key not in _SCHEDULE_ALIASES:
        choices = ", ".join(["default"] + [f"{name} ({s.label})" for name, s in SCHEDULES.items()])
        raise ValueError(f"unknown schedule {label!r}; choose one of: {choices}")
    return _SCHEDULE_ALIASES[key]


def parse_sampler(name):
    """(sampler, schedule or None) for our names, A1111's display names, either with a schedule appended
    ("dpmpp_2m_karras", "DPM++ 2M SDE Karras", "Euler SGM Uniform"), any case."""
    key = _normalized(name)
    if key in _ALIASES:
        return _ALIASES[key], None
    for label, schedule in _SCHEDULE_ALIASES.items():
        for separator in (" ", "_"):
            suffix = separator + label
            if key.endswith(suffix) and key[: -len(suffix)] in _ALIASES:
                sampler = _ALIASES[key[: -len(suffix)]]
                _check_schedule(sampler, schedule)
                return sampler, schedule
    choices = ", ".join(f"{ours} ({s.display})" for ours, s in SAMPLERS.items())
    raise ValueError(f"unknown sampler {name!r}; choose one of: {choices}")


def resolve_sampler(name):
    """The canonical name of `name` (see parse_sampler): the sampler, with its schedule appended if it names one
    ("DPM++ 2M Karras" -> "dpmpp_2m_karras"); make_scheduler and DISPLAY_NAMES accept it."""
    sampler, schedule = parse_sampler(name)
    return sampler if schedule is None else f"{sampler}_{schedule}"


def _check_schedule(sampler, schedule):
    s = SAMPLERS[sampler]
    if schedule is not None and schedule not in s.schedules:
        accepted = ", ".join(("default",) + s.schedules)
        raise ValueError(
            f"{sampler} ({s.display}) cannot use the {SCHEDULES[schedule].label} schedule; it takes: {accepted}"
        )


def _sampler_and_schedule(sampler, schedule):
    """The sampler and the schedule chosen by its name and / or `schedule`, which must agree."""
    name, named = parse_sampler(sampler)
    chosen = parse_schedule(schedule)
    if named is not None and chosen is not None and named != chosen:
        raise ValueError(f"sampler {sampler!r} names the {named} schedule but schedule {schedule!r} was given")
    chosen = chosen or named
    _check_schedule(name, chosen)
    return name, chosen


def make_scheduler(sampler, config, schedule=None, timestep_spacing=None, **overrides):
    """The sampler (any name parse_sampler accepts) built from a scheduler_config.json dict.

    schedule: None / "default" (the config's), "karras", "exponential", "beta", "sgm_uniform" or A1111's labels;
    timestep_spacing: None (the config's) or "leading" | "linspace" | "trailing", overriding the config;
    overrides: scheduler options (e.g. eta=0.5 for tcd). ValueError for combinations the sampler cannot take.
    """
    name, chosen = _sampler_and_schedule(sampler, schedule)
    s = SAMPLERS[name]
    known = s.cls.defaults.keys() | s.cls.unsupported.keys()
    options = dict(s.options)
    if chosen is not None:
        options.update({k: v for k, v in SCHEDULES[chosen].options.items() if k in known})
    if timestep_spacing is not None:
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(SPACINGS)}, got {timestep_spacing!r}")
        if "sgm_uniform" not in s.schedules:
            raise ValueError(f"{name} ({s.display}) has its own timesteps; it takes no timestep_spacing")
        if options.get("timestep_spacing", timestep_spacing) != timestep_spacing:
            raise ValueError(f"the sgm_uniform schedule is trailing spacing; it cannot be {timestep_spacing!r}")
        options["timestep_spacing"] = timestep_spacing
    scheduler = s.cls.from_config(config, **{**options, **overrides})
    scheduler.name = name
    return scheduler


def a1111_names(sampler, schedule=None):
    """(A1111 sampler name, A1111 "Schedule type" label or None) for writing an infotext in A1111 1.9+ style:
    a1111_names("dpmpp_2m", "karras") == a1111_names("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")."""
    name, chosen = _sampler_and_schedule(sampler, schedule)
    return SAMPLERS[name].display, (SCHEDULES[chosen].label if chosen else None)


def max_steps(sampler, config, schedule=None, timestep_spacing=None):
    """The most steps the sampler takes with this config (set_timesteps refuses more with a one-line ValueError):
    num_train_timesteps, less where the spacing would repeat a noise level or leave the training range, and
    original_inference_steps for lcm and tcd."""
    return make_scheduler(sampler, config, schedule, timestep_spacing).max_steps()


def _config_schedule(config, sampler):
    """The schedule a scheduler config turns on (use_*_sigmas), if the sampler takes it."""
    for name in ("karras", "exponential", "beta"):
        if config.get(f"use_{name}_sigmas") and name in SAMPLERS[sampler].schedules:
            return name
    return None


_FOR_CLASS = {s.cls.__name__: name for name, s in reversed(SAMPLERS.items())}  # the first sampler of each class


def default_sampler(config):
    """The sampler a scheduler_config.json asks for, with its schedule appended when the config turns one on
    (parse_sampler splits it): PNDMScheduler -> "pndm", DPMSolverMultistepScheduler with algorithm_type
    sde-dpmsolver++ and use_karras_sigmas -> "dpmpp_2m_sde_karras"; "euler" for classes not implemented here."""
    class_name = config.get("_class_name")
    sampler = _FOR_CLASS.get(class_name, "euler")
    if class_name == "DPMSolverMultistepScheduler" and config.get("algorithm_type") == "sde-dpmsolver++":
        sampler = "dpmpp_3m_sde" if config.get("solver_order", 2) == 3 else "dpmpp_2m_sde"
    schedule = _config_schedule(config, sampler)
    return sampler if schedule is None else f"{sampler}_{schedule}"


def sampler_lines():
    """What `mlx-sd samplers` prints: each sampler with its A1111 name, the schedules it takes and a line on it,
    then each schedule."""
    lines = [f"{'sampler':<13} {'A1111 name':<13} {'schedules':<48} about"]
    for name, s in SAMPLERS.items():
        schedules = ", ".join(("default",) + s.schedules)
        lines.append(f"{name:<13} {s.display:<13} {schedules:<48} {s.description}")
    lines += ["", f"{'schedule':<13} {'A1111 name':<13} about"]
    lines.append(f"{'default':<13} {'Automatic':<13} the model's scheduler config")
    lines += [f"{name:<13} {s.label:<13} {s.description}" for name, s in SCHEDULES.items()]
    return lines


__all__ = [
    "DDIMScheduler",
    "DEISMultistepScheduler",
    "DISPLAY_NAMES",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "TCDScheduler",
    "UniPCMultistepScheduler",
    "a1111_names",
    "default_sampler",
    "make_scheduler",
    "max_steps",
    "parse_sampler",
    "parse_schedule",
    "resolve_sampler",
    "sampler_lines",
]
