"""Arm names: coloured buttons (the paper's presentation) or numbers.

Schmied et al. (2025) show arms as coloured buttons: red, green, blue, yellow, orange for
5 arms, plus purple, pink, brown, black, white for 10. For 20 arms we extend the list with
ten more common colour words so every arm stays a single English word.
"""

from __future__ import annotations

from kdgap._checks import check_int

BUTTON_COLORS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "orange",
    "purple", "pink", "brown", "black", "white",
    "gray", "cyan", "magenta", "gold", "silver",
    "navy", "teal", "olive", "maroon", "lime",
)  # fmt: skip

ARM_STYLES = ("buttons", "numbers")
SUPPORTED_N_ARMS = (5, 10, 20)


def arm_names(n_arms: int, style: str = "buttons") -> tuple[str, ...]:
    """Return the display names of ``n_arms`` arms.

    Args:
        n_arms: number of arms, one of 5, 10, 20 (the paper's settings) or any value
            from 2 to 20 for custom studies.
        style: ``"buttons"`` (colour words) or ``"numbers"`` (``"1"`` .. ``"n_arms"``).

    Returns:
        A tuple of ``n_arms`` distinct names, index ``i`` naming arm ``i``.
    """
    if style not in ARM_STYLES:
        raise ValueError(f"style={style!r} is not an arm style; use one of {ARM_STYLES}.")
    check_int("n_arms", n_arms, minimum=2, maximum=len(BUTTON_COLORS),
              hint=f"(paper: {SUPPORTED_N_ARMS})")  # fmt: skip
    if style == "numbers":
        return tuple(str(i + 1) for i in range(n_arms))
    return BUTTON_COLORS[:n_arms]
