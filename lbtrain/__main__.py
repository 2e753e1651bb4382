from lbtrain.cli import main

main()
