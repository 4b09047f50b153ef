"""00_welcome runs top to bottom in JupyterLab, as a new user would run it."""

from lab import error_outputs, open_notebook, restart_and_run_all, screenshot


def test_welcome_runs_top_to_bottom_in_jupyterlab(page, lab):
    open_notebook(page, lab, "00_welcome.ipynb")
    # restart_and_run_all clears the stored outputs first: everything checked below comes from this run
    restart_and_run_all(page)
    text = page.locator(".jp-NotebookPanel .jp-Notebook").inner_text()
    screenshot(page, "00_welcome-after-run-all")
    assert error_outputs(page) == []
    assert "A: The capital of France is Paris." in text
    assert "trainable params: 134,515,008" in text
    assert page.locator(".jp-NotebookPanel .jp-RenderedImage img").count() >= 1  # the bar chart rendered
