from alseg.cli import entry

entry()
