from vfiomig.cli import run

run()
