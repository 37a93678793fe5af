"""The command line and the jobs behind it: run (the worked example), bench, the example data."""
