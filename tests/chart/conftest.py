import pytest

from tests.chart.rendering import VALUE_SETS, load_chart, render


@pytest.fixture(scope="session")
def chart():
    with load_chart() as loaded:
        yield loaded


@pytest.fixture(scope="session")
def rendered_sets(chart):
    """Every meaningful value set, rendered once for the whole session."""
    return {name: render(chart, values) for name, values in VALUE_SETS.items()}
