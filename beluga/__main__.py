from beluga.cli import main

main()
