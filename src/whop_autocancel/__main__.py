from whop_autocancel.cli import main

main()
