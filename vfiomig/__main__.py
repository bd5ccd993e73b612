from vfiomig._cli import run

run()
