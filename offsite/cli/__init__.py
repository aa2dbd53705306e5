"""The one ``offsite`` command line: thin commands over the role packages.

``main`` (the console script ``offsite``) imports the commands only when called, so importing a
sibling module such as ``offsite.cli.deploy`` does not load the whole CLI.
"""


def main() -> None:
    """Run the ``offsite`` command line."""
    from offsite.cli.main import main as run

    run()
