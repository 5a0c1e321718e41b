from nadi.cli import main

main()
